"""Collaboration between institutions: referrals, remote consultations and appointments."""
