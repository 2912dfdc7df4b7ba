// The EICAR anti-virus test file, as its specification defines it: the 68-byte string at the
// very start of the file, optionally followed by whitespace only (space, tab, LF, CR, Ctrl-Z),
// the whole file at most 128 bytes. The string anywhere else is not the test file.
//
// fleetscan reports the `threat_name` metadata of a matching rule as the threat name (the rule
// identifier when a rule has none).
rule EICAR_Test_File
{
    meta:
        threat_name = "EICAR-Test-File"
        description = "EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/)"

    strings:
        $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

    condition:
        $eicar at 0 and filesize <= 128 and
        (
            filesize == 68 or
            for all i in (68..filesize - 1) : (
                uint8(i) == 0x20 or uint8(i) == 0x09 or uint8(i) == 0x0a or
                uint8(i) == 0x0d or uint8(i) == 0x1a
            )
        )
}
