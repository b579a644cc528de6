
5
gw-1
regioneux86_64"0.1.0*
gateway1.0.0