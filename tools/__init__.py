"""Developer tools: the roofline model (``tools.roofline``) and the tile tuner (``tools.tune``)."""
