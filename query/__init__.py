"""The one time-series planner over both tiers: rollups, the raw lake and the hot store, and the latest
value per series. HTTP parameter parsing stays in `serving`."""
