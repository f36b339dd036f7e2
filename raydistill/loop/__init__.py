"""The adaptive data loop (issue 20): policies that turn measured student-teacher gaps into the next round's data."""
