"""Forensics: the story of every incident (which layer led, on which batch, whether it repeats) and the
skip list that keeps a resumed run from walking into it again."""
