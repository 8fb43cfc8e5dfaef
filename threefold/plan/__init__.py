"""`threefold plan` and `--layout auto`: hardware presets, memory and time models, the layout search and
calibration. Training never imports this package (the CLI does)."""
