"""Industrial objects on S3: video, CAD, lidar (the twins/objects/search issue); empty until it lands."""
