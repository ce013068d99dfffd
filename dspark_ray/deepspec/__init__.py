"""DeepSpec: build drafters for a target (prepare data, train, calibrate, evaluate)."""
