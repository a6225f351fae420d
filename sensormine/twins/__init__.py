"""Digital twins (the twins/objects/search issue); empty until it lands."""
