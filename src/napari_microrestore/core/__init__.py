"""Pure compute core: numpy (+ lazily torch) only; no Qt, no napari imports."""
