"""Adapters of the library to Ray Data and Ray Train. The library itself knows nothing of Ray."""
