"""MLIR context set-up and meshweave's IR vocabulary (attributes, markers, sharding values)."""
