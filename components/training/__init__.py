"""The generic trainer and the stage function that trains one configured model."""
