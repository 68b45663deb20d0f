"""Thin command-line entries: argument parsing and one-line errors; the work lives in the library modules."""
