"""Code the tests run beside plexrec that plexrec itself does not ship."""
