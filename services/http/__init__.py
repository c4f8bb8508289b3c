"""The HTTP gateway: a Ray Serve application in front of the replicas."""
