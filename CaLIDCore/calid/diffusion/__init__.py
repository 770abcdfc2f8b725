"""Noise schedule, DDIM sampling and inversion, slerp and the CaLID modes."""
