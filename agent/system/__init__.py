"""The daemon as a system service: systemd notify, config reload, the drop folder, the control socket, doctor."""
