"""Generators that turn H&E tiles into virtual IHC tiles, behind one small interface."""
