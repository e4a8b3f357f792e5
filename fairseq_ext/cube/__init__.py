"""The cube: parallel plans (search) and their application (runtime)."""
