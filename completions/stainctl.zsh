#compdef stainctl

_stainctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _STAINCTL_COMPLETE=complete_zsh stainctl)
}

compdef _stainctl_completion stainctl
