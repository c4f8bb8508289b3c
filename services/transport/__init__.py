"""Redis transport: the streams, journal and artifact store every service shares, and a private redis-server."""
