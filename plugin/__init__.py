"""The JAX side: tracing/lowering, marker primitives, the private-API adapter, compiling for meshes."""
