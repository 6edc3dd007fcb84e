"""The package version (one place: the package and the files it writes read it from here)."""

__version__ = "0.1.0"
