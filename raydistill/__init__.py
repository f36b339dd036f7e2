"""raydistill: a Ray-native platform for distilling large language models."""

__version__ = "0.1.0"
