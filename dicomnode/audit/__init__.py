"""The audit trail (IHE ATNA): what happened to patient data, for the hospital's audit
record repository. :mod:`.messages` are the DICOM audit messages, :mod:`.events` the node's
events, :mod:`.syslog` their carriage, :mod:`.trail` the writer every stage records to."""
