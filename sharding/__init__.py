"""Mesh construction and logical-to-mesh sharding rules: the only package that names mesh axes."""
