"""Executors for compiled stages: in-process now; Ray actors per mesh for multi-host later."""
