"""Datasets: turning public datasets into class folders of image files (``fashion_mnist/prepare.py``, run as
``python -m datasets.fashion_mnist.prepare``) and finding the data folder a recipe names (``default.py``)."""
