"""BLIP captioning of dataset folders (``harness caption``)."""
