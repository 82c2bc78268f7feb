"""Fashion-MNIST as raw class folders of PNG files; see ``prepare.py``."""
