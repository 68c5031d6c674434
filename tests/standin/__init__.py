"""Tests of the internal-system stand-in (no database needed)."""
