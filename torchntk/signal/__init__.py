"""Signal propagation: fixed points of a block's kernel map and the phase diagram."""

from .mean_field import DEFAULT_SPATIAL_SIZE, FixedPoints, Status, fixed_points, phase_diagram

__all__ = ['DEFAULT_SPATIAL_SIZE', 'FixedPoints', 'Status', 'fixed_points', 'phase_diagram']
