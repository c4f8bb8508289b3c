"""Ray wiring: placing and supervising the services on a cluster, local clusters, and the one-machine demo."""
