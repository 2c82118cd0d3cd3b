"""Writers that hand a drafter to other inference engines in the files they load."""
