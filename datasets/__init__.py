"""Dataset preparation commands (each turns a public dataset into raw class folders of image files)."""
