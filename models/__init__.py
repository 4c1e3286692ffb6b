"""Model code: detectors, image helpers and the SD 1.5 + ControlNet pipeline. Knows nothing of Cog."""
