#!/usr/bin/env python3
"""Runs a program that asks for a password on its terminal (e.g. gvnccapture), in a pty, and
answers the prompt with $VNC_PASSWORD. Exit status is the program's."""
import os, pty, sys, time

def main():
    password = os.environ.get("VNC_PASSWORD", "").encode() + b"\n"
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(sys.argv[1], sys.argv[1:])
    out, answered, deadline = b"", False, time.time() + 60
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"assword" in out:
            time.sleep(0.2)  # let the program switch echo off before we type
            os.write(fd, password)
            answered = True
    sys.stderr.write(out.decode(errors="replace"))
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))

main()
