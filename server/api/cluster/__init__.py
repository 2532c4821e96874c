"""The cluster's HTTP front (the Ray side is server.cluster): the routes a cluster answers from its
catalog, and the forwarding of every other request to a replica running the single server's app."""
