"""Console entry points: meshweave-opt (run passes on .mlir files), meshweave-solve (IOPDDL solver)."""
