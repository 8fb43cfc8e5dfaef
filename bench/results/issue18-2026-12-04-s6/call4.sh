bash bench/fp8_loss.sh  # call 4: with carry ["data/fp8-corpus"]
