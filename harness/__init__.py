"""harness: trusted transfer numbers for pretrained vision backbones."""

__version__ = "0.1.0"
