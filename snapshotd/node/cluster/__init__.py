"""A daemon's part in a cluster: the parts composed by :class:`ClusterNode`."""
