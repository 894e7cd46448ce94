"""Front-ends: the Lightning callback and the plain-PyTorch / Fabric loop, adapters over the step."""
