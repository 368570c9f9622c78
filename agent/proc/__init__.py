"""What every child process needs: scheduling classes, CPU pinning, death with the parent, exit reasons."""
