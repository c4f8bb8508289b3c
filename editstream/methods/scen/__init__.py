"""SCEN in servable form: per-fact small experts on one FFN, chosen per query row by indexing neurons."""
