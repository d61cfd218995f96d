"""The built-in "fashion" teacher: its architecture and the code that trains it."""
