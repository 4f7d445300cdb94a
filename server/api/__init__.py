"""The HTTP layer: FastAPI only, no torch. Validates, maps errors, and talks to the engine."""
