"""The parts behind `RayDogTaskRunner`: the driver-side session and its helpers, and the node
side (`node.py`, what runs inside Ray workers)."""
