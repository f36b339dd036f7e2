"""The adaptive data loop: policies that turn measured student-teacher gaps into the next round's data."""
