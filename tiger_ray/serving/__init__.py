"""Ray Serve serving of TIGER and the ANN baseline: `tiger serve`, the HTTP API and its client."""
