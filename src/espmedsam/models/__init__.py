"""Models for ESP-MedSAM: one file per paper component."""
