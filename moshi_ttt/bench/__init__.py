"""Speed, memory and computed cost of moshi-ttt against stock Moshi, measured in one run (``moshi-ttt bench``)."""
