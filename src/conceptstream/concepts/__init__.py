"""Concepts on disk, the data path of every command: folder format -> image paths -> RGB images.

- :mod:`conceptstream.concepts.folder`: the concept folder and sequence format (read, write, tokens).
- :mod:`conceptstream.concepts.images`: collecting a folder's image paths and loading them as RGB.
"""
